"""Training of learned caching policies (the L2C router) with the model frozen."""
