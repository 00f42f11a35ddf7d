"""The web side: the aiohttp app, its routes and handlers, who may call them, and the
background tasks that live as long as the app (presence)."""
