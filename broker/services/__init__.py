"""Business rules. Views, serializers, admin actions, commands and tasks call these."""
