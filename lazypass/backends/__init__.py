"""Backends: ``torch.compile(model, backend="lazydit")`` (inductor.py); ONNX and TensorRT."""
