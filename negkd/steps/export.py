"""placeholder"""
def command() -> None:
    """x"""
