"""Export stage: checkpoint -> verified ONNX -> engine directory (needs the export extra)."""
