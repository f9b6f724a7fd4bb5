"""The app's panes: the chat log, the token tree and the stage bars."""
