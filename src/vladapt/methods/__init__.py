"""Adaptation methods and their registry."""

from vladapt.methods.registry import create_method, list_methods, register_method

__all__ = ["create_method", "list_methods", "register_method"]
