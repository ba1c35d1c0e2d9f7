"""Networks (DiT family) and encoders."""
