"""negkd: distill chain-of-thought reasoning from a teacher LLM into a small student,
learning from the teacher's correct *and* incorrect rationales (NAT, NCE, ASC)."""

__version__ = "0.1.0"
