"""The model endpoints, one module each; every one follows app.http.endpoint's protocol."""

from app.http.endpoints.decode import Decode
from app.http.endpoints.encode import Encode
from app.http.endpoints.interpolate import Interpolate
from app.http.endpoints.roundtrip import Roundtrip
from app.http.endpoints.sample import Sample

ENDPOINTS = [Encode(), Decode(), Roundtrip(), Sample(), Interpolate()]
