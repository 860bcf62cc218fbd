"""From a change to every cache layer: outbox, bus, workers, CDN purges."""
