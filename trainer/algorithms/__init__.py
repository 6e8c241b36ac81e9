"""RL math as pure functions on tensors: rewards, KL estimators, advantage estimators, losses, TIS, whitening.

Each module's docstring states its formulas; nothing here knows about models, processes or devices.
"""
