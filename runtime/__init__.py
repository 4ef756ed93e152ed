"""The lean runtime: numpy + onnxruntime (TensorRT optional) + a C extension.

Never imports torch or transformers: a Jetson image often has neither.
"""
