"""PLACEHOLDER (owned by the gather work): vectorised NumPy segment samplers."""


def sample_segments(*a, **k):
    raise NotImplementedError


sample_sup_pairs = sample_segments
