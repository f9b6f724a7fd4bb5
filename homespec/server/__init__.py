"""The local OpenAI-compatible server (DESIGN §8): ``openai.py`` shapes, ``service.py`` runs the engine,
``app.py`` routes, ``metrics.py`` counts. Only this package and ``cli/`` turn HomespecError into responses."""
