"""Router middlewares loaded with ``--slime-router-middleware-paths``: Starlette/ASGI middleware classes built as
``cls(app, router=router)`` (slime's contract), where ``router`` is the ``router.server.Router``."""
