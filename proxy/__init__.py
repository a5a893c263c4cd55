"""The aiohttp proxy process: gateway proxy for browsers, forward proxy for agents."""
