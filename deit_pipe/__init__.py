"""deit-pipe: DeiT training with the teacher's outputs computed once and stored."""

__version__ = "0.1.0"
