"""Conversation data sets."""
