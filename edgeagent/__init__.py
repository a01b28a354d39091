"""windedge edge agent: a wire-compatible SageMaker Edge Agent on ONNX Runtime."""
