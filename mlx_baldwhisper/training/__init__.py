"""On-laptop training: data loading, batching and cached encoder features."""
