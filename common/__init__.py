"""common: the base every other package stands on (the error base, the settings); it imports none of them."""
