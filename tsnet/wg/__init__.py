"""WireGuard (Noise_IKpsk2) as a sans-IO protocol core."""
