"""The accelerator side of clipmaps: model loading, the shared ViT toolkit, the text cache, the method modules, their
predictors and the one actor Ray Data runs in every pool.

``registry`` (one entry per method) and ``params`` (their settings and bounds) import no torch: the driver reads
them to validate and fingerprint jobs. Everything else here is loaded inside Ray workers. Method modules
(``clipmaps.actors.methods``) are pure torch and never import Ray.
"""
