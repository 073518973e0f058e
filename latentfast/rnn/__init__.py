"""RNNs for dynamical systems on the fused recurrent ops."""
from latentfast.rnn.models import GRU, LSTM, SequenceModel, fit_sequence_model, valid_prediction_time

__all__ = ["GRU", "LSTM", "SequenceModel", "fit_sequence_model", "valid_prediction_time"]
