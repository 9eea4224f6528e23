"""The portable Pallas kernel (interpret mode on CPU) against the reference: every shared case."""

from .test_base import AttentionTestBase


class TestPortable(AttentionTestBase):
    impl = "pallas"
    interpret = True
