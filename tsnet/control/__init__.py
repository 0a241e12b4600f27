"""The control plane: ts2021 transport, client, and an embedded coordination server."""
