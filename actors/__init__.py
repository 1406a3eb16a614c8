"""The accelerator side of clipmaps: model loading, the shared ViT toolkit, text cache and the method modules.

Method modules (``clipmaps.actors.methods``) are pure torch and never import Ray.
"""
