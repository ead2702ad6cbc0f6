"""detector: streaming anomaly detection with recurrent autoencoders."""
