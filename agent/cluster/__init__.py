"""The cluster component: one image list from the sources admins have, served to every node."""
