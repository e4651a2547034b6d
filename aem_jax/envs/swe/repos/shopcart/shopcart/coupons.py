"""Coupons: fixed or percentage discounts with a minimum spend."""
from shopcart.pricing import percent_off


def parse_coupon(code):
    """Parses 'SAVE10' (10 percent) or 'FLAT500' (500 cents) codes."""
    code = code.strip().upper()
    if code.startswith("SAVE") and code[4:].isdigit():
        return ("percent", int(code[4:]))
    if code.startswith("FLAT") and code[4:].isdigit():
        return ("flat", int(code[4:]))
    raise ValueError(f"unknown coupon {code!r}")


def apply_coupon(amount, code, minimum=0):
    """Amount after the coupon; unchanged below the minimum spend."""
    kind, value = parse_coupon(code)
    if amount < minimum:
        return amount
    if kind == "percent":
        return percent_off(amount, value)
    return max(0, amount - value)


def best_coupon(amount, codes, minimum=0):
    """The code giving the lowest total (first one on ties), or None."""
    best_code, best_total = None, amount
    for code in codes:
        total = apply_coupon(amount, code, minimum)
        if total < best_total:
            best_code, best_total = code, total
    return best_code
