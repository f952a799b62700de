"""The SDBackend protocol, its diffusers implementation, and tiny random-weight models."""
