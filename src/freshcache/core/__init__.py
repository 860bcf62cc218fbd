"""Pure logic: keys, policies, rules and plans. No I/O, no asyncio."""
