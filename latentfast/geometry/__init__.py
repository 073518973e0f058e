"""Riemannian geometry of latent spaces: metric, curve energy/length, geodesics,
interpolation and extrapolation, distances, clustering, nearest neighbours, random walks."""
from latentfast.geometry.core import (GeodesicResult, as_mlp, curve_energy, curve_length,
                                      distance_matrix, energy_and_grad, exp_map, extrapolate,
                                      geodesic, geodesic_acceleration, graph_init, interpolate,
                                      kmedoids, knn, knn_predict, metric, random_walk,
                                      riemannian_kmeans, straight_line, volume_measure)

__all__ = ["GeodesicResult", "as_mlp", "curve_energy", "curve_length", "distance_matrix",
           "energy_and_grad", "exp_map", "extrapolate", "geodesic", "geodesic_acceleration",
           "graph_init", "interpolate", "kmedoids", "knn", "knn_predict", "metric", "random_walk",
           "riemannian_kmeans", "straight_line", "volume_measure"]
