"""The Textual app. Importing it loads Textual but not torch or transformers: the models load in a
worker after the window is up."""
