"""The cart: items with unit prices (cents) and quantities."""


class Cart:
    """Maps item names to (unit price in cents, quantity)."""

    def __init__(self):
        self.items = {}

    def add(self, name, price, quantity=1):
        """Adds quantity units of an item; the price must match earlier adds."""
        if quantity <= 0:
            raise ValueError("quantity must be positive")
        if price < 0:
            raise ValueError("price must not be negative")
        if name in self.items:
            old_price, old_quantity = self.items[name]
            if old_price != price:
                raise ValueError("price differs from the item already in the cart")
            quantity += old_quantity
        self.items[name] = (price, quantity)

    def remove(self, name, quantity=1):
        """Removes units of an item, dropping it when none are left."""
        if name not in self.items:
            raise KeyError(name)
        price, current = self.items[name]
        remaining = current - quantity
        if remaining > 0:
            self.items[name] = (price, remaining)
        else:
            del self.items[name]

    def count(self):
        """Total number of units in the cart."""
        return sum(quantity for _, quantity in self.items.values())

    def subtotal(self):
        """Sum of price * quantity over the items, in cents."""
        return sum(price * quantity for price, quantity in self.items.values())
