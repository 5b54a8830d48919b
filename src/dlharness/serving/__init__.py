"""Models that go to work: the served image classifier, logging the run's models, the registry
lifecycle, and the serve, predict and promote commands."""
