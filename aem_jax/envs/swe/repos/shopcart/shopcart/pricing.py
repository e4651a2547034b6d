"""Discounts, tax and rounding (all amounts in integer cents)."""


def round_half_up(value):
    """Rounds a non-negative float to the nearest int, halves upwards."""
    return int(value + 0.5)


def percent_off(amount, percent):
    """Amount after a percentage discount (0..100)."""
    if percent < 0 or percent > 100:
        raise ValueError("percent must be within 0..100")
    return round_half_up(amount * (100 - percent) / 100)


def bulk_discount(unit_price, quantity, threshold=10, percent=5):
    """Line total with percent off when quantity reaches threshold."""
    total = unit_price * quantity
    if quantity >= threshold:
        return percent_off(total, percent)
    return total


def add_tax(amount, rate_percent):
    """Amount plus tax at rate_percent, rounded half up."""
    return amount + round_half_up(amount * rate_percent / 100)


def format_cents(amount):
    """Formats cents as dollars, e.g. 1234 -> '$12.34'."""
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    return f"{sign}${amount // 100}.{amount % 100:02d}"
