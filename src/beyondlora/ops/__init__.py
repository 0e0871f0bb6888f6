"""Pure tensor math shared by the adapters: no state, no modules."""
