"""Data pipelines for xlsr-jax: from audio files on disk to global device batches.

Submodules are imported explicitly (`from data_pipelines import audio`) so that importing the
package stays cheap and pulls in no audio or JAX dependencies.
"""
