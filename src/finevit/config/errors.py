class ConfigError(ValueError):
    """An invalid configuration; the message has one sentence per problem, one per line."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
