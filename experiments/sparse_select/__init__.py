"""Dynamic block selection and token reordering on real attention (jaxeff issue 19): run.py."""
