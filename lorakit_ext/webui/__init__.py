"""The only package that imports A1111's `modules`; everything here is loaded lazily inside the WebUI."""
