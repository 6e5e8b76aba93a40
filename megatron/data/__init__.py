"""Token datasets: NeoX `.bin/.idx` files, packed samples, splits and the resumable loader."""
