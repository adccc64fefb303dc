"""Experiments built on training and evaluation: the grid sweep (``sweep``), the λ × a ablation (``ablation``)
and the offline demo (``demo``)."""
