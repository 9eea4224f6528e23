"""Per-block attention mass from a cached log-sum-exp (AdaSpa's exact block scores): ``api.py``
picks an implementation (``reference`` = plain jnp, ``pallas`` = portable.py)."""
