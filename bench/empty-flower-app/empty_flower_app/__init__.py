"""An empty Flower app: a ServerApp that times query messages, a ClientApp that answers at once."""
