"""behaviorlm: user behaviour as a language.

Layers, each a sub-package, data flowing one way (see README "How it works"):
``data`` -> ``sequence`` -> ``nn`` -> ``inference`` -> (``recommender``, ``evaluation``,
``propensity``, ``segments``, ``explain``) -> ``tracking``, ``service``, ``cli``.
Importing the package is cheap: nothing heavy loads until a layer is used.
"""

__version__ = "0.8.0"
