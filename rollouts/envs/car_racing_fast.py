"""CarRacingFast: gymnasium's CarRacing-v3 with a faster, pixel-identical renderer.

Why it is fast. Stock CarRacing draws every observation on a 1000x800 surface, flips it and
smoothscales it to 96x96. About 70% of a step goes to ``_render_road``, which rebuilds the 400
grass squares and then rotates, scales and culls ~800 static polygons one at a time in Python (a
``Vector2.rotate_rad`` per vertex), although only ~60 get drawn. Here the static polygons are
stacked into arrays once per track and transformed and culled with a handful of whole-array
numpy operations; only the ~25 that can change a visible pixel reach ``gfxdraw``. The rest of a
step is trimmed too: the score font stays open instead of being reopened every step and the
score text is rendered once per string; surfaces are reused instead of allocated; the background
field is one ``fill`` when it covers the screen; the full-size vertical flip is replaced by
flipping the 96x800 intermediate of the smoothscale; the car's ~40 vertices are transformed in
one batch; and the observation is read out as row-major bytes.

Why it is identical. Physics, track generation, rewards and termination are inherited unchanged
(only rendering is overridden), and every drawing call that can change a visible pixel is made
with the same arguments and in the same order as stock:

* Vertex coordinates are bit-identical. pygame-ce's ``Vector2.rotate_rad`` reduces the angle
  with ``fmod``, swaps/negates coordinates when it is within 1e-6 of a multiple of pi/2, and
  otherwise computes ``cos(a) * x - sin(a) * y`` and ``sin(a) * x + cos(a) * y`` in plain double
  arithmetic. ``_rotate`` repeats exactly that (libm ``sin``/``cos`` through ``math``, one
  rounding per numpy operation, same order), then ``x * zoom + tx`` like stock, and the results
  reach ``gfxdraw`` as Python floats in stock's vertex order.
* The polygons drawn are those stock draws (any vertex inside the screen grown by
  ``MAX_SHAPE_DIM``) minus those whose bounding box lies over ``_MARGIN`` pixels outside the
  visible area. ``gfxdraw`` truncates vertices to integers and its anti-aliased edges reach one
  pixel past them, so such a polygon changes no visible pixel. "Visible" excludes the top
  ``_HIDDEN_ROWS`` rows of the upside-down canvas: after the flip stock paints an opaque black
  indicator bar over exactly those rows.
* Colours are read at draw time (tiles are recoloured in place on contact, ``domain_randomize``
  changes them on reset) and converted as stock does.
* The field ``fill`` is used only when the visible area grown by ``_MARGIN`` lies inside the
  transformed (convex) field square, where stock's filled polygon sets every visible pixel and
  its outline is out of sight. The fill value is the pixel ``gfxdraw`` itself writes for that
  colour object.
* pygame-ce's ``smoothscale`` shrinks X row by row and then Y, and smoothscaling to ``(w, 800)``
  then to ``(w, h)`` gives the same pixels as one call. Since X-shrinking is per row, it is
  applied to the upside-down canvas and its rows reversed afterwards. The indicator bar, the
  indicators and the score are drawn exactly as stock draws them, on a separate full-size
  surface whose bar rows are shrunk in X and stacked below; a sentinel row above the bar catches
  any indicator reaching above it, and then stock's full-size flip is used instead.
* The car: Box2D's ``transform * vertex`` is float32 arithmetic that numpy float32 reproduces;
  see ``_draw_car``.

The tests compare every observation with stock's (several seeds, resets, ``domain_randomize``,
``rgb_array``, quarter-turn angles, the field edge, indicator overflow).
"""

from __future__ import annotations

import math
import os

# Set before pygame creates any window so the env is headless by default; a caller who exported
# SDL_VIDEODRIVER keeps their choice.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import numpy as np  # noqa: E402
import pygame  # noqa: E402
from gymnasium.envs.box2d.car_dynamics import SIZE, WHEEL_R, WHEEL_W, WHEEL_WHITE  # noqa: E402
from gymnasium.envs.box2d.car_racing import (  # noqa: E402
    GRASS_DIM,
    MAX_SHAPE_DIM,
    PLAYFIELD,
    SCALE,
    STATE_H,
    STATE_W,
    VIDEO_H,
    VIDEO_W,
    WINDOW_H,
    WINDOW_W,
    ZOOM,
    CarRacing,
)
from pygame import gfxdraw  # noqa: E402

__all__ = ["CarRacingFast"]

# pygame-ce math.c: TWO_PI, M_PI_2 and the default Vector2 epsilon used by rotate_rad.
_TWO_PI = 2.0 * math.pi
_HALF_PI = math.pi / 2.0
_VECTOR_EPSILON = 1e-6

# Pixels of slack around the visible area. gfxdraw truncates vertices to integers (< 1 px) and
# anti-aliased edges spill 1 px; 4 leaves a safety factor without costing any real culling.
_MARGIN = 4.0

# After the vertical flip, CarRacing._render_indicators paints an opaque black bar over rows
# [H - 5 * H / 40, H), i.e. over pre-flip rows [0, _HIDDEN_ROWS): nothing drawn there before the
# flip reaches any output, so those rows are neither drawn nor copied.
_HIDDEN_ROWS = round(5 * (WINDOW_H / 40.0))

# The score text only takes a few hundred distinct values per episode; bound the cache anyway.
_TEXT_CACHE_MAX = 512

# Same expressions as stock's _render_road so the floats are the same.
_GRASS = np.array(
    [
        [
            (GRASS_DIM * x + GRASS_DIM, GRASS_DIM * y + 0),
            (GRASS_DIM * x + 0, GRASS_DIM * y + 0),
            (GRASS_DIM * x + 0, GRASS_DIM * y + GRASS_DIM),
            (GRASS_DIM * x + GRASS_DIM, GRASS_DIM * y + GRASS_DIM),
        ]
        for x in range(-20, 20, 2)
        for y in range(-20, 20, 2)
    ],
    dtype=np.float64,
)
_FIELD = [
    (PLAYFIELD, PLAYFIELD),
    (PLAYFIELD, -PLAYFIELD),
    (-PLAYFIELD, -PLAYFIELD),
    (-PLAYFIELD, PLAYFIELD),
]
# Pre-flip rows that reach the output, and (post-flip) the bar's rows.
_VISIBLE_RECT = pygame.Rect(0, _HIDDEN_ROWS, WINDOW_W, WINDOW_H - _HIDDEN_ROWS)
_BAR_RECT = pygame.Rect(0, WINDOW_H - _HIDDEN_ROWS, WINDOW_W, _HIDDEN_ROWS)
_SENTINEL_RECT = pygame.Rect(0, _BAR_RECT.top - 1, WINDOW_W, 1)
# Not a colour the indicators draw, nor a grey of the white-on-black score text.
_SENTINEL_COLOR = (1, 2, 3)
# Visible-area corners grown by the margin, for the field-covers-screen test.
_SCREEN_CORNERS = [
    (-_MARGIN, _HIDDEN_ROWS - _MARGIN),
    (WINDOW_W + _MARGIN, _HIDDEN_ROWS - _MARGIN),
    (WINDOW_W + _MARGIN, WINDOW_H + _MARGIN),
    (-_MARGIN, WINDOW_H + _MARGIN),
]


def _rotation_terms(angle: float) -> tuple[float | None, float]:
    """pygame-ce's angle handling in ``Vector2.rotate_rad``: ``(sin, cos)``, or ``(None,
    quadrant)`` when it special-cases a multiple of pi/2 (within its epsilon) as an exact
    coordinate swap."""
    angle = math.fmod(angle, _TWO_PI)
    if angle < 0:
        angle += _TWO_PI
    if math.fmod(angle + _VECTOR_EPSILON, _HALF_PI) < 2 * _VECTOR_EPSILON:
        return None, int((angle + _VECTOR_EPSILON) / _HALF_PI)
    # math.sin/cos are the same libm calls pygame-ce makes; numpy's SIMD ones may differ by 1 ulp.
    return math.sin(angle), math.cos(angle)


def _quarter_turn(x, y, quadrant: int):
    if quadrant in (0, 4):
        return x, y
    if quadrant == 1:
        return -y, x
    if quadrant == 2:
        return -x, -y
    return y, -x


def _rotate(x, y, angle: float):
    """pygame-ce ``Vector2.rotate_rad`` on arrays (or floats), bit-identical per element: plain
    double multiplies and adds in the same order, no fused multiply-add."""
    sin_a, cos_a = _rotation_terms(angle)
    if sin_a is None:
        return _quarter_turn(x, y, int(cos_a))
    return cos_a * x - sin_a * y, sin_a * x + cos_a * y


def _covers_screen(quad: list[tuple[float, float]]) -> bool:
    """Whether the screen grown by ``_MARGIN`` lies inside the convex ``quad`` (either winding).

    Convexity makes the four grown corners sufficient, and then every pixel centre is at least
    ``_MARGIN`` away from the quad's edges.
    """
    sign = 0
    for i in range(4):
        x0, y0 = quad[i]
        x1, y1 = quad[(i + 1) % 4]
        ex, ey = x1 - x0, y1 - y0
        for cx, cy in _SCREEN_CORNERS:
            cross = ex * (cy - y0) - ey * (cx - x0)
            if cross == 0 or (sign and (cross > 0) != (sign > 0)):
                return False
            sign = 1 if cross > 0 else -1
    return True


def _shrink_buffers(size: tuple[int, int]) -> tuple[pygame.Surface, ...]:
    """Reused surfaces for ``_image_without_flip``: the scene's rows shrunk in X, the (w, H)
    intermediate, its bar rows, and the output."""
    width = size[0]
    full_x = pygame.Surface((width, WINDOW_H))
    return (
        pygame.Surface((width, _VISIBLE_RECT.height)),
        full_x,
        full_x.subsurface((0, _BAR_RECT.top, width, _BAR_RECT.height)),
        pygame.Surface(size),
    )


class CarRacingFast(CarRacing):
    """CarRacing-v3 whose observations equal stock's bit for bit, rendered several times faster.

    Only rendering is overridden; see the module docstring for why the pixels cannot differ.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._polys: np.ndarray | None = None  # world vertices: grass, then road
        self._poly_colors: list | None = None  # road colour objects, read at draw time
        self._polys_source: list | None = None  # the road_poly list the arrays were built from
        self._canvas: pygame.Surface | None = None  # the scene, drawn upside down like stock
        self._flipped: pygame.Surface | None = None  # what stock's transform.flip returns
        self._scaled: dict[tuple[int, int], pygame.Surface] = {}
        self._shrink_buffers: dict[tuple[int, int], tuple[pygame.Surface, ...]] = {}
        self._overlay: pygame.Surface | None = None  # indicator bar, drawn as on the flipped one
        self._overlay_bar: pygame.Surface | None = None
        self._canvas_visible: pygame.Surface | None = None
        self._sentinel = 0
        self._font: pygame.font.Font | None = None
        self._text_cache: dict[str, pygame.Surface] = {}
        self._probe: pygame.Surface | None = None
        self._car_shapes: list | None = None  # float32 fixture vertices per drawn car body
        self._car_shapes_for = None  # the Car they belong to

    # ----------------------------------------------------------------------------- geometry

    def _create_track(self):
        ok = super()._create_track()
        if ok:
            self._build_polys()
        return ok

    def _build_polys(self) -> None:
        road = [poly for poly, _ in self.road_poly]
        road_arr = np.array(road, dtype=np.float64).reshape(len(road), 4, 2)
        # Stored as (2, 4, N): x and y planes, one row per vertex slot.
        self._polys = np.ascontiguousarray(
            np.concatenate([_GRASS, road_arr], axis=0).transpose(2, 1, 0)
        )
        # Keep the colour objects themselves: tile colours are numpy arrays mutated in place.
        self._poly_colors = [color for _, color in self.road_poly]
        self._polys_source = self.road_poly

    # ------------------------------------------------------------------------------ drawing

    def _render(self, mode: str):
        assert mode in self.metadata["render_modes"]

        pygame.font.init()
        if self.screen is None and mode == "human":
            pygame.display.init()
            self.screen = pygame.display.set_mode((WINDOW_W, WINDOW_H))
        if self.clock is None:
            self.clock = pygame.time.Clock()

        if "t" not in self.__dict__:
            return  # reset() not called yet

        if self._canvas is None:
            self._canvas = pygame.Surface((WINDOW_W, WINDOW_H))
            self._flipped = pygame.Surface((WINDOW_W, WINDOW_H))
        self.surf = self._canvas

        assert self.car is not None
        angle = -self.car.hull.angle
        zoom = 0.1 * SCALE * max(1 - self.t, 0) + ZOOM * SCALE * min(self.t, 1)
        scroll_x = -(self.car.hull.position[0]) * zoom
        scroll_y = -(self.car.hull.position[1]) * zoom
        trans = pygame.math.Vector2((scroll_x, scroll_y)).rotate_rad(angle)
        trans = (WINDOW_W / 2 + trans[0], WINDOW_H / 4 + trans[1])

        self._render_road(zoom, trans, angle)
        if mode == "state_pixels":
            self._draw_car(zoom, trans, angle)
        else:  # with tyre-mark particles, which only these modes draw
            self.car.draw(self.surf, zoom, trans, angle, True)

        if mode != "human":
            size = (STATE_W, STATE_H) if mode == "state_pixels" else (VIDEO_W, VIDEO_H)
            image = self._image_without_flip(size)
            if image is not None:
                return image

        self.surf = self._flip_visible()

        self._render_indicators(WINDOW_W, WINDOW_H)

        text = self._score_text(f"{self.reward:04.0f}")
        text_rect = text.get_rect()
        text_rect.center = (60, WINDOW_H - WINDOW_H * 2.5 / 40.0)
        self.surf.blit(text, text_rect)

        if mode == "human":
            pygame.event.pump()
            self.clock.tick(self.metadata["render_fps"])
            assert self.screen is not None
            self.screen.fill(0)
            self.screen.blit(self.surf, (0, 0))
            pygame.display.flip()
        elif mode == "rgb_array":
            return self._create_image_array(self.surf, (VIDEO_W, VIDEO_H))
        elif mode == "state_pixels":
            return self._create_image_array(self.surf, (STATE_W, STATE_H))
        else:
            return self.isopen

    def _draw_car(self, zoom, translation, angle) -> None:
        """``Car.draw(surf, zoom, translation, angle, draw_particles=False)``, vectorised.

        Box2D's ``transform * vertex`` is ``(c * x - s * y) + p`` in float32 (``b2Mul``); the same
        float32 numpy operations give the same floats, then pygame's rotation as for the road.
        Draw calls, colours and their order are stock's: per fixture its polygon, then for a
        wheel the white stripe when visible.
        """
        car = self.car
        if self._car_shapes_for is not car:
            # Fixture shapes are fixed for a car's life; only body transforms change.
            self._car_shapes = [
                [np.array(f.shape.vertices, dtype=np.float32) for f in obj.fixtures]
                for obj in car.drawlist
            ]
            self._car_shapes_for = car
        local, transforms, polygons = [], [], []
        for obj, shapes in zip(car.drawlist, self._car_shapes, strict=True):
            t = obj.transform
            transform = (t.q.c, t.q.s, t.position[0], t.position[1])
            color = [int(c * 255) for c in obj.color]
            for vertices in shapes:
                local.append(vertices)
                transforms.append(transform)
                polygons.append((color, len(vertices)))
                if "phase" not in obj.__dict__:
                    continue
                a1 = obj.phase
                a2 = obj.phase + 1.2
                s1 = math.sin(a1)
                s2 = math.sin(a2)
                c1 = math.cos(a1)
                c2 = math.cos(a2)
                if s1 > 0 and s2 > 0:
                    continue
                if s1 > 0:
                    c1 = np.sign(c1)
                if s2 > 0:
                    c2 = np.sign(c2)
                # Stock's expressions in double; Box2D then rounds them to float32.
                white = [
                    (-WHEEL_W * SIZE, +WHEEL_R * c1 * SIZE),
                    (+WHEEL_W * SIZE, +WHEEL_R * c1 * SIZE),
                    (+WHEEL_W * SIZE, +WHEEL_R * c2 * SIZE),
                    (-WHEEL_W * SIZE, +WHEEL_R * c2 * SIZE),
                ]
                local.append(np.array(white, dtype=np.float64).astype(np.float32))
                transforms.append(transform)
                polygons.append((WHEEL_WHITE, 4))

        counts = [len(v) for v in local]
        vertices = np.concatenate(local)
        cos_q, sin_q, pos_x, pos_y = np.repeat(
            np.array(transforms, dtype=np.float32), counts, axis=0
        ).T
        vx, vy = vertices[:, 0], vertices[:, 1]
        world_x = (cos_q * vx - sin_q * vy) + pos_x
        world_y = (sin_q * vx + cos_q * vy) + pos_y
        xs, ys = _rotate(world_x.astype(np.float64), world_y.astype(np.float64), angle)
        points = np.stack([xs * zoom + translation[0], ys * zoom + translation[1]], axis=-1)
        points = points.tolist()
        surf = self.surf
        start = 0
        for color, n in polygons:
            pygame.draw.polygon(surf, color=color, points=points[start : start + n])
            start += n

    def _image_without_flip(self, size: tuple[int, int]) -> np.ndarray | None:
        """Stock's ``size`` image from the upside-down canvas without a full-size flip, or
        ``None`` when that is not provably identical (then the caller goes the stock way).

        Smoothscaling to ``(w, H)`` then to ``(w, h)`` equals one smoothscale, and the first
        stage works row by row, so it runs on the canvas and only its small result is flipped.
        The bar, indicators and score are drawn as stock draws them (``_render_indicators`` draws
        on ``self.surf``) but on a separate surface, which is only sound while they stay within
        the bar's rows.
        """
        width, height = size
        if not (width < WINDOW_W and height < WINDOW_H):
            return None
        buffers = self._shrink_buffers.get(size)
        if buffers is None:
            buffers = self._shrink_buffers[size] = _shrink_buffers(size)
        if self._overlay is None:
            self._overlay = pygame.Surface((WINDOW_W, WINDOW_H))
            self._overlay_bar = self._overlay.subsurface(_BAR_RECT)
            self._sentinel = self._overlay.map_rgb(_SENTINEL_COLOR)
            self._canvas_visible = self._canvas.subsurface(_VISIBLE_RECT)

        overlay = self.surf = self._overlay
        overlay.fill(self._sentinel, _SENTINEL_RECT)
        self._render_indicators(WINDOW_W, WINDOW_H)
        text = self._score_text(f"{self.reward:04.0f}")
        text_rect = text.get_rect()
        text_rect.center = (60, WINDOW_H - WINDOW_H * 2.5 / 40.0)
        if text_rect.top < _BAR_RECT.top:
            return None
        overlay.blit(text, text_rect)
        # Indicators are rectangles hanging from inside the bar (e.g. a wheel spinning at
        # > 400 rad/s reaches higher): one reaching above the bar crosses the sentinel row.
        sentinel_row = pygame.surfarray.pixels2d(overlay)[:, _SENTINEL_RECT.top]
        spilled = bool((sentinel_row != self._sentinel).any())
        del sentinel_row
        if spilled:
            return None

        scene_x, full_x, full_x_bar, dest = buffers
        smoothscale = pygame.transform.smoothscale
        smoothscale(self._canvas_visible, (width, _VISIBLE_RECT.height), scene_x)
        smoothscale(self._overlay_bar, (width, _BAR_RECT.height), full_x_bar)
        src = pygame.surfarray.pixels2d(scene_x)
        dst = pygame.surfarray.pixels2d(full_x)
        dst[:, : _VISIBLE_RECT.height] = src[:, ::-1]
        del src, dst
        smoothscale(full_x, size, dest)
        # Row-major RGB bytes are stock's transposed pixels3d copy, at half the cost.
        rgb = np.frombuffer(pygame.image.tobytes(dest, "RGB"), dtype=np.uint8)
        return rgb.reshape(height, width, 3).copy()  # writeable, like stock's

    def _flip_visible(self) -> pygame.Surface:
        """Stock's ``transform.flip(surf, False, True)`` for every row that stays visible, copied
        into a reused surface (no 3 MB allocation and zeroing per step); the rows left stale are
        the ones the indicator bar paints over next."""
        src = pygame.surfarray.pixels2d(self._canvas)
        dst = pygame.surfarray.pixels2d(self._flipped)
        dst[:, : WINDOW_H - _HIDDEN_ROWS] = src[:, : _HIDDEN_ROWS - 1 : -1]
        # The pixel arrays lock their surfaces; release them before anything blits.
        del src, dst
        return self._flipped

    def _score_text(self, string: str) -> pygame.Surface:
        text = self._text_cache.get(string)
        if text is None:
            if len(self._text_cache) >= _TEXT_CACHE_MAX:
                self._text_cache.clear()
            text = self._text_cache[string] = self._render_text(string)
        return text

    def _render_text(self, string: str) -> pygame.Surface:
        if self._font is not None:
            try:
                return self._font.render(string, True, (255, 255, 255), (0, 0, 0))
            except pygame.error:
                pass  # font module quit (e.g. pygame.quit() in any env's close()) since opened
        self._font = pygame.font.Font(pygame.font.get_default_font(), 42)
        return self._font.render(string, True, (255, 255, 255), (0, 0, 0))

    def _render_road(self, zoom, translation, angle):
        if self._polys is None or self._polys_source is not self.road_poly:
            self._build_polys()
        surf = self.surf

        self._render_field(zoom, translation, angle)

        # (4, N) layout: reductions over the 4 vertices run along contiguous rows, ~20x faster
        # than reducing the short last axis of an (N, 4) array.
        xs, ys = _rotate(self._polys[0], self._polys[1], angle)
        xs = xs * zoom + translation[0]
        ys = ys * zoom + translation[1]
        # Stock's cull: draw if any vertex lies in the screen grown by MAX_SHAPE_DIM.
        in_box = (
            (xs >= -MAX_SHAPE_DIM)
            & (xs <= WINDOW_W + MAX_SHAPE_DIM)
            & (ys >= -MAX_SHAPE_DIM)
            & (ys <= WINDOW_H + MAX_SHAPE_DIM)
        ).any(axis=0)
        # Ours on top: drop polygons that cannot touch a visible pixel.
        touches = (
            (xs.max(axis=0) >= -_MARGIN)
            & (xs.min(axis=0) <= WINDOW_W + _MARGIN)
            & (ys.max(axis=0) >= _HIDDEN_ROWS - _MARGIN)
            & (ys.min(axis=0) <= WINDOW_H + _MARGIN)
        )
        (drawn,) = np.nonzero(in_box & touches)
        if drawn.size == 0:
            return
        # (n, 4, 2) nested lists of Python floats, vertices in stock's order.
        points = np.stack([xs[:, drawn].T, ys[:, drawn].T], axis=-1).tolist()

        n_grass = _GRASS.shape[0]
        grass_color = self.grass_color
        road_colors = self._poly_colors
        aapolygon = gfxdraw.aapolygon
        filled_polygon = gfxdraw.filled_polygon
        for idx, poly in zip(drawn.tolist(), points, strict=True):
            if idx < n_grass:
                color = grass_color
            else:
                color = [int(c) for c in road_colors[idx - n_grass]]
            aapolygon(surf, poly, color)
            filled_polygon(surf, poly, color)

    def _render_field(self, zoom, translation, angle) -> None:
        """Draw the background field exactly like stock, as one ``fill`` when that is provably
        the same."""
        surf = self.surf
        # Four points: scalar Python floats are cheaper than numpy here and round identically.
        field = []
        for x, y in _FIELD:
            rx, ry = _rotate(x, y, angle)
            field.append((rx * zoom + translation[0], ry * zoom + translation[1]))
        if _covers_screen(field):
            surf.fill(self._mapped(self.bg_color), _VISIBLE_RECT)
            return
        # Stock draws on a fresh (black) surface; the canvas is reused, so clear it first.
        surf.fill(0)
        gfxdraw.aapolygon(surf, field, self.bg_color)
        gfxdraw.filled_polygon(surf, field, self.bg_color)

    def _mapped(self, color) -> int:
        """The pixel value gfxdraw writes for ``color`` on the canvas (opaque colours only)."""
        if self._probe is None:
            self._probe = pygame.Surface((1, 1))
        gfxdraw.pixel(self._probe, 0, 0, color)
        return self._probe.get_at_mapped((0, 0))

    def _create_image_array(self, screen, size):
        # Same smoothscale as stock, into a reused destination of the same format.
        dest = self._scaled.get(size)
        if dest is None:
            dest = self._scaled[size] = pygame.Surface(size)
        pygame.transform.smoothscale(screen, size, dest)
        return np.transpose(np.array(pygame.surfarray.pixels3d(dest)), axes=(1, 0, 2))
