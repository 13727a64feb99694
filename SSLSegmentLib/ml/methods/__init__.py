"""SSL methods, one module each, selectable by name (`get_method("brl")`). See base.py for the interface."""

from SSLSegmentLib.ml.methods.base import MethodOutput, SSLMethod, StepContext, available_methods, get_method, register_method

__all__ = ["MethodOutput", "SSLMethod", "StepContext", "available_methods", "get_method", "register_method"]
