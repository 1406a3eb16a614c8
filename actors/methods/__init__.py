"""The four methods, one module each: ``gem``, ``maskclip``, ``legrad``, ``maskinversion``."""
