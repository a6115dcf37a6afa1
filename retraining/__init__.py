"""retraining: dataset assembly, PyTorch training, ONNX export and registration with lineage."""
