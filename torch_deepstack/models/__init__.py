"""Small DeepSeek-V3-style models built from deepstack ops, for the demo, tests and benchmarks."""
from torch_deepstack.models.tiny_deepseek import TinyDeepSeek, TinyDeepSeekConfig  # noqa: F401
